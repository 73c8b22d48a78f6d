"""The benchmark CLI of normlayers: ``normlayers-bench`` or ``python -m normlayers.bench`` (see :mod:`.cli`)."""
