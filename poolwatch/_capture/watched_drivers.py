"""The recorders of the driver pools watched now (asyncpg's, psycopg_pool's).

Each library's ``hook_pool`` adds its recorder and ``unhook_pool`` takes it away; the test guard
(``_guard``) reads their checkout tables. A weak set: a recorder nobody watches any more goes.
"""

from __future__ import annotations

import weakref
from typing import Any

recorders: weakref.WeakSet[Any] = weakref.WeakSet()
