"""Bad input, told apart from bugs.

Whatever ptune raises for input that is wrong (a config key or value, a file, a data set, a
checkpoint, a flag) is a `UserError` whose message names the culprit and the fix; the launchers
print it as one `error:` line and exit with status 2. Any other exception, a ValueError from JAX,
numpy or Orbax included, is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input, with a message naming the culprit and the fix. A ValueError, so that code
    catching ValueError (and tests expecting one) keeps working."""


class AssetError(UserError):
    """A shipped asset (ptune.assets) is missing, fails its checksum, or cannot be fetched; the
    message says the fix."""
