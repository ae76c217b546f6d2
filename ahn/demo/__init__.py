"""The built-in demo: a small teacher trained on associative recall, and its evaluation."""
