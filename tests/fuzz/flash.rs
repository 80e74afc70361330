//! Fuzz targets of `attnkit::flash` (see main.rs for the harness).
