"""The tests' control plane: ``nvo3.harness`` under the names the tests use."""

from nvo3.harness import WAIT
from nvo3.harness import ControlPlane as Slice
from nvo3.harness import start_control_plane as start_slice

__all__ = ["WAIT", "Slice", "start_slice"]
