"""One task vocabulary for the whole library: task names ↔ integer ids, with aliases.

The contrastive loss needs integer task labels (all noise levels are ONE task, docs/method.md §2.3), the
online proxies state which tasks each proxy covers, a render cache stores the tasks of each slot by name.
``TaskVocabulary`` is the one mapping they all accept, so names and ids cannot drift apart:

    vocabulary.id("denoise_25") == vocabulary.id("noise") == 0

Aliases map upstream names (folder names, PromptIR's ``de_type`` ``denoise_15/25/50``, ``derain`` …) onto a
task; ``labels`` turns a batch of names, aliases, ids or upstream codes (``table=``) into a ``(B,)`` int64 tensor.
"""
from __future__ import annotations

from numbers import Integral
from typing import Iterable, Iterator, Mapping, Sequence

import torch

TaskLike = str | int

# the upstream names of the standard tasks (AirNet / PromptIR / AdaIR ``de_type``, Perceive-IR, MoCE-IR)
STANDARD_ALIASES: dict[str, str] = {
    "denoise": "noise", "denoise_15": "noise", "denoise_25": "noise", "denoise_50": "noise",
    "dehaze": "haze", "derain": "rain", "deblur": "blur",
    "enhance": "lowlight", "low_light": "lowlight", "synllie": "lowlight",
}
# AirNet / PromptIR / AdaIR ``de_dict`` ids (the ``de_id`` their data sets return) → task
PROMPTIR_DE_IDS: dict[int, str] = {0: "noise", 1: "noise", 2: "noise", 3: "rain", 4: "haze", 5: "blur", 6: "lowlight"}


class TaskVocabulary:
    """Ordered task ``names`` (id = position) and ``aliases`` (other name → one of ``names``).

    ``id``/``name`` accept a name, an alias or an id; unknown values raise ``ValueError`` listing what is known.
    Two vocabularies are equal when their names and aliases are.
    """

    def __init__(self, names: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
        names = tuple(names)
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct non-empty strings, got {list(names)}")
        self.names = names
        self.aliases: dict[str, str] = {}
        for alias, target in (aliases or {}).items():
            if target not in names:
                raise ValueError(f"alias {alias!r} points to {target!r}, which is not one of the names {list(names)}")
            if alias in names and alias != target:
                raise ValueError(f"alias {alias!r} is itself a task name; it cannot also mean {target!r}")
            self.aliases[alias] = target
        self._ids = {name: index for index, name in enumerate(names)}

    def with_aliases(self, aliases: Mapping[str, str]) -> "TaskVocabulary":
        """A copy with more aliases (e.g. your folder names → task names)."""
        return TaskVocabulary(self.names, {**self.aliases, **aliases})

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, task: object) -> bool:
        return task in self._ids or task in self.aliases

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskVocabulary) and (self.names, self.aliases) == (other.names, other.aliases)

    def __hash__(self) -> int:
        return hash((self.names, tuple(sorted(self.aliases.items()))))

    def __repr__(self) -> str:
        return f"TaskVocabulary({list(self.names)}, aliases={self.aliases})"

    def id(self, task: TaskLike) -> int:
        """The integer id of a name, an alias or an id (checked to be in range)."""
        if isinstance(task, torch.Tensor) and task.numel() == 1 and not task.is_floating_point():
            task = int(task)
        if isinstance(task, Integral) and not isinstance(task, bool):
            task = int(task)                                   # also NumPy integers
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise ValueError(f"a task must be a name, an alias or an integer id, got {type(task).__name__} {task!r}")
        if isinstance(task, int):
            if not 0 <= task < len(self.names):
                raise ValueError(f"task id {task} is outside this vocabulary ({self._describe()}); pass your own "
                                 "TaskVocabulary([...]) for other task ids")
            return task
        name = self.aliases.get(task, task)
        if name not in self._ids:
            raise ValueError(f"unknown task {task!r}: the vocabulary has {self._describe()}"
                             f"{' and aliases ' + str(sorted(self.aliases)) if self.aliases else ''}; add it with "
                             "TaskVocabulary.with_aliases({...}) or pass your own TaskVocabulary")
        return self._ids[name]

    def name(self, task: TaskLike) -> str:
        """The task name of a name, an alias or an id."""
        return self.names[self.id(task)]

    def ids(self, tasks: Iterable[TaskLike]) -> tuple[int, ...]:
        return tuple(self.id(task) for task in tasks)

    def labels(self, tasks: Sequence[TaskLike] | torch.Tensor, *, table: Mapping | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """``(B,)`` int64 task ids of a batch: names, aliases or ids, or codes looked up in ``table`` first
        (e.g. ``PROMPTIR_DE_IDS`` for the ``de_id`` PromptIR's data set returns)."""
        if isinstance(tasks, torch.Tensor):
            if tasks.ndim != 1 or tasks.is_floating_point() or tasks.dtype == torch.bool:
                raise ValueError(f"task labels must be a (B,) integer tensor, got {tasks.dtype} {tuple(tasks.shape)}")
            if table is None:
                self.ids(tasks.tolist())  # range check
                return tasks.to(device=device, dtype=torch.int64)
            tasks = tasks.tolist()
        if isinstance(tasks, (str, bytes)):
            raise ValueError(f"tasks must be a sequence of tasks, one per sample, got the string {tasks!r}")
        if table is not None:
            missing = sorted({t for t in tasks if t not in table}, key=repr)
            if missing:
                raise ValueError(f"task codes {missing} are not in the table (it has {list(table)})")
            tasks = [table[t] for t in tasks]
        return torch.tensor(self.ids(tasks), dtype=torch.int64, device=device)

    def _describe(self) -> str:
        return ", ".join(f"{name}={index}" for index, name in enumerate(self.names))


STANDARD_TASKS = TaskVocabulary(("noise", "haze", "rain", "blur", "lowlight"), STANDARD_ALIASES)


def as_vocabulary(tasks: TaskVocabulary | Sequence[str] | None, name: str = "tasks") -> TaskVocabulary:
    """``None`` → ``STANDARD_TASKS``; a vocabulary as is; a sequence of names → a vocabulary of them."""
    if tasks is None:
        return STANDARD_TASKS
    if isinstance(tasks, TaskVocabulary):
        return tasks
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise ValueError(f"{name} must be a TaskVocabulary or a sequence of task names, got {tasks!r}")
    return TaskVocabulary(tasks)
