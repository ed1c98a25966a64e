"""Front ends: the ways users meet pycompart, all on the one runtime. Main only.

``app`` is the library (``App``, ``@app.entrypoint``); ``importhook``,
``proxy``, ``callbacks`` and ``run`` make up the shim for unmodified
programs (``pycompart run``: the import hook, main's stand-ins for what
lives in module compartments, main's callback gate); ``cli`` is the command
line and ``bench`` the benchmark. The source rewriter (Pitchfork's role)
lands here too.

May import everything below it. Nothing below imports a front end.
"""
