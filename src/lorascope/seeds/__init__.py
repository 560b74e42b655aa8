"""``lorascope seeds``: every result of a profile across seed triples, each seed a DVC experiment."""
