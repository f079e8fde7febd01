"""Optional dependencies, imported lazily and named with their extra when missing.

Every lazy import of an optional package goes through ``require``, so that a
user without it reads what needs it and the ``pip install`` that provides it
(the extras are in pyproject.toml), not a bare "No module named 'onnx'".
"""

import importlib


def require(module, extra, what, package=None):
    """Import an optional module, or say which extra provides it.

    Parameters
    ----------
    module : str
        The module to import, e.g. ``"onnx"`` or ``"numba.cuda"``.
    extra : str or None
        numlstm's extra that installs it (``"onnx"``, ``"dask"``, ``"cuda"``,
        ...), or None where there is none: then the message names the package.
    what : str
        What needs the module, e.g. ``"numlstm.convert.from_onnx"``.
    package : str, optional
        The distribution to name when it differs from the module's top-level
        name (``"dask.distributed"`` for ``distributed``).

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        If ``module`` (or a parent package of it) is not installed. A module
        that is installed but fails to import raises its own error unchanged:
        "pip install" would not fix it.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        if e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise  # the module is there; one of *its* imports is missing
        package = package or parts[0]
        how = f'pip install "numlstm[{extra}]"' if extra else f"pip install {package}"
        raise ImportError(f"{what} needs the {package} package: {how}", name=module) from None
