"""Exceptions raised for bad input. Each names the file or value at fault."""

from collections.abc import Mapping


class InternVLError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(InternVLError, ValueError):
    """A config.json that cannot be read or asks for maths we do not implement."""


class CheckpointError(InternVLError, ValueError):
    """Weights that are missing, unexpected, mis-shaped, corrupt or not safetensors."""


class ResumeSettingsError(CheckpointError):
    """A resume whose settings (flags, data, model files, process count) differ from the checkpoint's: every
    process of a run reads the same checkpoint and finds the same differences."""


class SaveError(CheckpointError):
    """Files that could not be written (a full disk, a read-only folder); `reason` is the cause, one line."""

    def __init__(self, folder, reason: str, outcome: str):
        super().__init__(f"{folder}: saving failed ({reason}); {outcome}")
        self.folder, self.reason, self.outcome = folder, reason, outcome

    def __reduce__(self):  # pickled whole: training sends a failed save to the other processes
        return SaveError, (self.folder, self.reason, self.outcome)


class OutputError(InternVLError):
    """A command's output that could not be written (stdout on a full disk)."""


class InputError(InternVLError, ValueError):
    """A bad image, video, prompt or data record given by a user."""


class SettingError(InputError):
    """Bad input that a setting changes (a pixel limit, a tile count), or a bad setting. The message names
    each setting as the Python parameter (`max_pixels`); `named` gives the same error with the names another
    surface's user knows: a command's flag (`--max-pixels`), a server's flag. `parts` alternate text and
    setting names: text, setting, text, ..."""

    def __init__(self, *parts: str):
        super().__init__("".join(parts))
        self.parts = parts

    def named(self, names: Mapping[str, str]) -> "SettingError":
        """This error with each setting that `names` holds named as it says."""
        return type(self)(*(names.get(part, part) if i % 2 else part for i, part in enumerate(self.parts)))


def located(error: InputError, where: str) -> InputError:
    """`error`, of its type and naming its settings as it does, with `where` before its message."""
    if isinstance(error, SettingError):
        return type(error)(where + error.parts[0], *error.parts[1:])
    return type(error)(where + str(error))


class PromptTooLongError(SettingError):
    """A prompt (history and image tokens included) longer than the model or the batch can hold; its hint
    names the settings that shorten it (`max_num`), as SettingError's parts."""


class NumericsError(InternVLError, RuntimeError):
    """A model whose activations overflowed to NaN or inf on an input (float16 weights, whose range the
    activations of these models exceed): its answer would be garbage."""


class TrainingError(InternVLError, RuntimeError):
    """A training run that cannot go on (its loss diverged)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised on by a command after it said so in a line of its own (what was kept, what to run next): the
    command line then adds no line end of its own."""
