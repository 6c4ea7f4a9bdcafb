"""A sequence of runs: which run teaches the next, one cache build per teacher under a lock in a shared
folder (local or an object store), and the whole sequence's cost (``runs``, ``folder``)."""
