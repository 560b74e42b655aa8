"""``report`` stage: the paper's tables and figures, an index tying them to their runs, and the
offline HTML feature dashboard."""
