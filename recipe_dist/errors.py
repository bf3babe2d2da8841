"""The one base class for user-facing errors: the CLI prints their message on one line and exits 2."""


class RecipeError(Exception):
    """Bad input (config, model, data, checkpoint); the message names the key, file or URL."""
