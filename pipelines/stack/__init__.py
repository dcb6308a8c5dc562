"""The embedded stack: every server oncoserve needs, on one machine, bound to loopback."""

from pipelines.stack.components import StackError
from pipelines.stack.embedded import ComponentStatus, EmbeddedStack, is_healthy

__all__ = ["EmbeddedStack", "StackError", "ComponentStatus", "is_healthy"]
