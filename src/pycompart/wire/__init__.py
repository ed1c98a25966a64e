"""The wire: what crosses a compartment boundary, and in what shape. No I/O.

Used on both sides of the trust boundary. ``protocol`` is the sans-IO frame
and message state machine (bytes in, events out, as h11 does for HTTP);
``contract`` turns an entrypoint's annotations into msgspec codecs (the
typed call gate); ``exceptions`` describes and rebuilds exceptions (never
pickled, never imported by name); ``refs`` decides what crosses by value, by
name or by handle for module compartments; ``config`` is the plain-data
configuration and lock-down plan an instance receives.

May import: ``pycompart.errors`` only. Everything here can be fuzzed without
processes.
"""
