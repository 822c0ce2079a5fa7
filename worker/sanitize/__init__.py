"""The sanitization engine: framework-neutral (no web, queue or database imports; the
import-linter contracts in pyproject.toml keep it so). docs/method.md describes the method.

Import what you need from its modules (``pipeline.sanitize``, ``config.SanitizeConfig``); this
package file holds only the version, so that ``config``, ``errors`` and ``formats`` can be used
without loading torch.
"""

# The project's version, written only here: pyproject.toml and the API read it, and every report
# carries it.
__version__ = "0.1.0"
