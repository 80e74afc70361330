//! Fuzz targets of `attnkit::monarch` (see main.rs for the harness).
