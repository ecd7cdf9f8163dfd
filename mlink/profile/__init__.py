"""User profiles (white paper "Profiles and Directory"): one model behind
vCard-temp, XEP-0154 and avatars, with a per-field policy saying whether the
directory, the user, the configuration or mlink's store owns each field.

`fields` holds the XEP-0154 mapping and resolves the configuration;
`model.ProfileService` reads and writes profiles under those policies.
"""

from mlink.profile.fields import (
    FIELDS,
    PHOTO_FIELD,
    FieldSpec,
    ProfileConfigError,
    check_profiles,
    resolve_fields,
)
from mlink.profile.model import Profile, ProfileError, ProfileService, profiles_of

__all__ = [
    "FIELDS",
    "PHOTO_FIELD",
    "FieldSpec",
    "Profile",
    "ProfileConfigError",
    "ProfileError",
    "ProfileService",
    "check_profiles",
    "profiles_of",
    "resolve_fields",
]
