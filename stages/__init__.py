"""One module per stage: a config dataclass, the artifact kinds it reads and writes, and ``run``.

Stage modules hold no CLI code; ``avatarcli.cli`` wraps each in a thin command.
"""
