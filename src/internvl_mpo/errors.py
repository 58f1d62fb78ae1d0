"""Exceptions raised for bad input. Each names the file or value at fault."""


class InternVLError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(InternVLError, ValueError):
    """A config.json that cannot be read or asks for maths we do not implement."""


class CheckpointError(InternVLError, ValueError):
    """Weights that are missing, unexpected, mis-shaped, corrupt or not safetensors."""


class SaveError(CheckpointError):
    """Files that could not be written (a full disk, a read-only folder); `reason` is the cause, one line."""

    def __init__(self, folder, reason: str, outcome: str):
        super().__init__(f"{folder}: saving failed ({reason}); {outcome}")
        self.folder, self.reason, self.outcome = folder, reason, outcome

    def __reduce__(self):  # pickled whole: training sends a failed save to the other processes
        return SaveError, (self.folder, self.reason, self.outcome)


class InputError(InternVLError, ValueError):
    """A bad image, video, prompt or data record given by a user."""


class PromptTooLongError(InputError):
    """A prompt (history and image tokens included) longer than the model or the batch can hold."""


class TrainingError(InternVLError, RuntimeError):
    """A training run that cannot go on (its loss diverged)."""
