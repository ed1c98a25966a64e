"""A module whose import fails: it needs a module nowhere installed."""

import no_such_module_xyz  # noqa: F401
