"""The injector: secrets into a command's environment (`secretfs run`), into config templates
(`secretfs inject`) and into loaded config objects (`secretfs.resolve_refs`).

- refs.py       which variables hold references, from --env, dotenv files and the environment
- resolve.py    reading the values: through a live mount (no key needed) or the store
- supervise.py  running the command: exec, or a supervisor for masking, signals and --watch
- run.py        the two commands, in the order that keeps them safe: resolve all, then start

Kept apart from ``secretfs`` so that `secretfs run` through a mount imports neither trio nor
pyfuse3 nor cryptography: it only opens files. docs/injector.md is the user reference.
"""
