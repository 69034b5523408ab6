"""The one Django configuration the Django test modules share, made by whichever is imported
first: the ``default`` alias (a SQLite file; tests/fields/test_django.py points it at a file of
its own per session) and ``pg`` (the session's PostgreSQL server, filled in by its fixture).
Each module configuring Django its own way made the suite depend on their order: a module
that configured only ``default`` first left the others without ``pg``.

Importing it skips the importing module when Django is missing, unless
``KEYMGR_REQUIRE_INTEROP=1`` (CI), where the import error fails it instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

if os.environ.get("KEYMGR_REQUIRE_INTEROP") != "1":
    pytest.importorskip("django")
import django  # noqa: E402
from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                              "NAME": str(Path(tempfile.mkdtemp(prefix="keymgr-django-"))
                                                          / "default.sqlite3")},
                                  "pg": {"ENGINE": "django.db.backends.postgresql", "NAME": "keymgr",
                                         "USER": "keymgr", "HOST": ""}},
                       INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
