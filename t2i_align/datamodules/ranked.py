"""Training pairs chosen by the model itself, round by round (FineRewards' ARL; :class:`~t2i_align.lightning_modules.ARL`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from .datamodule import T2IDataModule
from .pairs import PairDataset, PairSource
from .prompts import Prompt, load_prompt_sources


@runtime_checkable
class RoundSelection(Protocol):
    """A method that makes its own training pairs, round by round (:class:`~t2i_align.lightning_modules.ARL`)."""

    def prepare_round(self, round_index: int, prompts: Sequence[Prompt]) -> Path:
        """Select round ``round_index``'s pairs for ``prompts`` (resumable) and return their ``metadata.jsonl``."""


class RankedPairsData(T2IDataModule):
    """``train_prompts`` are the prompts to generate for; at the start of every epoch (= ARL round) the
    training loader asks the LightningModule (a :class:`RoundSelection`) for the round's kept pairs and streams
    them. Set ``trainer.reload_dataloaders_every_n_epochs: 1`` and bound a round with
    ``trainer.limit_train_batches``. Validation sets work as in :class:`T2IDataModule`.

    Why the loader asks, not the module: ``train_dataloader`` is the first hook that sees the round of a resumed
    run (Lightning restores the epoch after ``on_fit_start`` and builds the first loader before
    ``on_train_start``/``on_train_epoch_start``; lightning/pytorch/loops/fit_loop.py, ``run``/``setup_data``), so
    a round chosen in a module hook would feed the loader a round late.

    The checkpointed position holds the round: a run resumed inside a round continues that round's stream
    (its pairs are already on disk), a new round starts its stream from the beginning.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.train_prompts:
            raise ValueError("RankedPairsData needs train_prompts (the prompts the model generates for)")
        if self.train_pairs is not None:
            raise ValueError("RankedPairsData makes its own pairs: remove train_pairs")
        self.round: int | None = None

    def train_dataloader(self):
        trainer = self.trainer
        if trainer is None or not isinstance(trainer.lightning_module, RoundSelection):
            raise RuntimeError("RankedPairsData needs a method that selects its own pairs per round (RoundSelection: "
                               "the ARL method)")
        round_index = trainer.current_epoch
        prompts = load_prompt_sources(self.train_prompts)[0]
        metadata = trainer.lightning_module.prepare_round(round_index, prompts)
        state = self.state_dict()
        same_round = state.pop("round", None) == round_index
        self._train_sets = {"pairs": PairDataset.from_source(PairSource(str(metadata)), self.resolution, self.seed)}
        self._samplers, self._pending_state = None, state if same_round else {}
        self.round = round_index
        return super().train_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round if self._samplers is not None else self._pending_state.get("round")}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        round_index = state.pop("round", None)
        if self._samplers is not None and round_index == self.round:
            self._apply_state(state)
        else:
            self._pending_state = {**state, "round": round_index}

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        super()._apply_state({kind: s for kind, s in state.items() if kind != "round"})
