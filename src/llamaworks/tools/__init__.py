"""Tools for the model: registry (JSON schema), tool-call parsing per chat format, calculator,
sandboxed python, the agent loop."""
