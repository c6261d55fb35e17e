"""The one typed run config (`RLHFConfig`, in `schema.py`): the only home of every default.

Loading (`load.py`) goes dict -> `msgspec.convert` with unknown fields forbidden, then the cross-field
checks (`checks.py`). Nothing is rewritten after parsing: a bad combination is an error naming the fields.
"""

from .docs import field_docs  # noqa: F401
from .load import load_config, parse_overrides, read_config_file, redact, secret_values  # noqa: F401
from .schema import ClusterConfig, ConfigError, RLHFConfig, RoleResources, RolesConfig, WandbConfig  # noqa: F401
