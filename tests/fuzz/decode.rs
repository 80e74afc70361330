//! Fuzz targets of `attnkit::decode` (see main.rs for the harness).
