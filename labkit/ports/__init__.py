"""ports: other-language ports of the models (the Swift port): build, run, reference dumps."""
