//! Fuzz targets of `attnkit::lightning` (see main.rs for the harness).
