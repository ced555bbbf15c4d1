"""Runtime: the plumbing every chapter uses, below all of them. Worker processes that end
with their parent (:mod:`.processes`), reading weights and checkpoints without running code
from the file (:mod:`.serialization`) and warnings that point at the user's code rather than
at this package (:mod:`.user_warnings`). Nothing here imports another chapter."""
