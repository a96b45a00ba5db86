"""The tokenizer package's one error."""


class TokenizerError(ValueError):
    """Bad tokenizer input (file, corpus, conversation); the message says what was expected."""
