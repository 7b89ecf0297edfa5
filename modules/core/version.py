"""The project's version, recorded in every exported model's ``litprune.json``."""

VERSION = "0.5.0"
