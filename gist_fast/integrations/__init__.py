"""Integrations with other libraries, each in its own module and imported only on request.

- `gist_fast.integrations.sentence_transformers`: drop-in ``GISTEmbedLoss`` and
  ``CachedGISTEmbedLoss`` for sentence-transformers (needs ``sentence-transformers``).

Importing ``gist_fast`` or this package imports none of those libraries.
"""
