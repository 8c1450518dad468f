"""Bad input to the evaluation tools: an InputError says in one line what was wrong and where (the
file, the entry, the field or flag); the commands end with it on stderr and exit status 2, without a
traceback (`megatron_lcl.eval.cli.run_cli`), as the training driver does for configuration errors.

    raise InputError(f"{path}: images[3].sentences[1]: no 'raw' (has keys ['tokens'])")
"""

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad input the user can fix. `every_rank`: all ranks meet the same error (only rank 0 prints
    it); False for one rank's own (e.g. its part of a batch was unreadable: that rank prints it)."""

    def __init__(self, message: str, every_rank: bool = True):
        super().__init__(" ".join(str(message).splitlines()))  # one line, always
        self.every_rank = every_rank
