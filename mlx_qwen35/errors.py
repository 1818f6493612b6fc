"""The one exception type users see for bad input.

Every message names the file, tensor, field or argument at fault and what was
expected; the CLI prints it as a single line and exits non-zero.
"""


class Qwen35Error(ValueError):
    """Bad input: a config, checkpoint, argument or file that cannot be used."""
