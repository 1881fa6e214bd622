"""The exception the tools raise for a problem with what the user asked for."""


class UsageError(Exception):
    """A problem with what the user asked for: the command line prints the message, not a traceback."""


def require(module: str, extra: str = "train"):
    """`import module`, or a UsageError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"{module} is not installed; install it with pip install 'retnet-hf[{extra}]'") from error
