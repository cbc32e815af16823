"""Settings: the schema (`schema`), how it is read (`load`), shown (`docs`), and the weight format (`formats`).

Every other layer reads its configuration from here, so this package imports none of them."""

from .formats import TORCHAO_BITS, WEIGHT_FORMAT_NAMES, weight_format, weight_formats
from .load import LoadedSettings, Source, build_parser, load_settings, parse_value, setting_fields, torch_sdp_flag
from .job import JobSettings, JobValueError, job_defaults, job_fields, validate_job
from .schema import ACTIVE, PLANNED, UNSUPPORTED, Settings, SettingsError

__all__ = ["ACTIVE", "PLANNED", "UNSUPPORTED", "JobSettings", "JobValueError", "job_fields", "validate_job",
           "LoadedSettings", "Settings", "SettingsError", "Source",
           "TORCHAO_BITS", "WEIGHT_FORMAT_NAMES", "build_parser", "job_defaults", "load_settings", "parse_value",
           "setting_fields", "torch_sdp_flag", "weight_format", "weight_formats"]
