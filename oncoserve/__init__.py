"""oncoserve's platform core: settings and the clients every layer shares.

This package imports none of the layers (imaging, training, serving, services, pipelines);
all of them may import it.
"""

__version__ = "0.1.0"
