"""One module per clause of the privacy policy: the decisions each clause makes, as pure functions."""
