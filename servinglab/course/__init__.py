"""The course room: what the course adds around the runtime.

- :mod:`.grading` ``servinglab grade`` (points per part, Gradescope JSON, stub checks);
- :mod:`.doctor` ``servinglab doctor`` (set-up checks); :mod:`.notebook` notebook helpers.

May import every other room; nothing imports it (except the CLI).
"""
