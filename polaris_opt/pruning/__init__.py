"""Pruning: which weights can be pruned, how they are scored and masked, and how a pruned graph
is rewritten (structured) and corrected. The passes `prune` and `prune-structured` drive it."""
