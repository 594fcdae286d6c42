"""The built-in plugins, and what a third-party plugin imports (README, "Writing a plugin"):

from apigate.plugins import Plugin, PluginConfig, PluginEnv, Response, reject
"""

from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import reject

__all__ = ["Plugin", "PluginConfig", "PluginEnv", "Response", "reject"]
