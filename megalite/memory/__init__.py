"""Memory: what a rank holds, predicted from the config (`model`) and measured exactly (`measure`).

`tools/bench_memory.py` prints one beside the other for a grid of layouts."""
from megalite.memory.measure import (
    LiveSavedBytes,
    SavedTensorBytes,
    model_storages,
    native_state_bytes,
    per_token_and_fixed,
    replay_peak_bytes,
)
from megalite.memory.model import (
    STATE_BYTES,
    Layout,
    in_flight,
    layer_activation_bytes,
    layer_activation_bytes_per_token,
    layer_fixed_bytes,
    state_bytes,
)

__all__ = ["LiveSavedBytes", "SavedTensorBytes", "model_storages", "native_state_bytes", "per_token_and_fixed",
           "replay_peak_bytes", "STATE_BYTES", "Layout", "in_flight",
           "layer_activation_bytes", "layer_activation_bytes_per_token", "layer_fixed_bytes", "state_bytes"]
