"""The sanitization engine: framework-neutral (no web, queue or database imports).

Import what you need from its modules (``pipeline.sanitize``, ``config.SanitizeConfig``); this
package file stays empty so that ``config`` and ``errors`` can be used without loading torch.
"""

__version__ = "0.1.0"
