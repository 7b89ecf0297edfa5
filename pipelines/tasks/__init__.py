"""What differs between models in a run: one task class per kind of model (:class:`pipelines.tasks.base.Task`).

The model config names its task by ``_target_`` (``model.task``); :mod:`pipelines.flow` runs
every model through the same phases and asks the task only through the base class's methods.
"""
