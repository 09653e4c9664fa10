class Sam3DInputError(ValueError):
    """A request the engine cannot answer because of its input; the message is meant for the user."""
