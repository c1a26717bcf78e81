"""How much memory the machine has, how much is free, and how hard the OS is squeezing.

Layers, each usable on its own: `sizes` (``6GB`` and back), `snapshot` (one reading of the
machine, and the definitions used throughout), `parse` (pure functions from recorded OS
text to numbers), `probe` (run the command or read the file, hand the text to a parser:
``take_snapshot()``), `budget` (the bytes mlxd may plan for, and what it may allocate now)
and `pressure` (a snapshot as green / yellow / red).
"""
