//! Layered settings: flags and their environment variables (read by clap), over the
//! configuration file, over a fallback, over the declared default, with the source of every
//! value kept so that an error can say where a bad value came from.
//!
//! Each program declares a setting once, as a field of a struct deriving both `clap::Args`
//! and `serde::Deserialize`: the clap `id` is the file key, and the flag, variable and default
//! sit in the same attribute. [`Flags`] keeps what clap parsed; [`Flags::pick`] layers one
//! setting.

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};
use std::ffi::OsString;
use std::fmt;
use std::marker::PhantomData;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag (`--secret-shares`).
    Flag(String),
    /// An environment variable (`BANK_VAULTS_SECRET_SHARES`).
    Env(String),
    /// The configuration file, under the setting's key.
    File,
    /// The built-in default.
    Default,
}

impl Source {
    /// Whether the user set it (rather than it being the default).
    pub fn is_set(&self) -> bool {
        *self != Source::Default
    }
}

/// ` (from flag --x)`: what follows a file key in an error message.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, " (from flag {flag})"),
            Source::Env(var) => write!(f, " (from environment variable {var})"),
            Source::File => f.write_str(" (from the configuration file)"),
            Source::Default => f.write_str(" (the default)"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone)]
pub struct Layered<T> {
    /// The value.
    pub value: T,
    /// Its source.
    pub source: Source,
}

impl<T> Layered<T> {
    /// A value from the environment variable `var` (a layer below the file, such as
    /// `VAULT_ADDR`).
    pub fn from_env(var: &str, value: Option<T>) -> Option<Self> {
        value.map(|value| Self {
            value,
            source: Source::Env(var.to_owned()),
        })
    }
}

/// What clap parsed for the settings `S`: values from flags, from their environment
/// variables, and the declared defaults, each with its [`ValueSource`].
pub struct Flags<S> {
    matches: ArgMatches,
    settings: PhantomData<fn() -> S>,
}

impl<S> Clone for Flags<S> {
    fn clone(&self) -> Self {
        Self {
            matches: self.matches.clone(),
            settings: PhantomData,
        }
    }
}

impl<S> fmt::Debug for Flags<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets: only which settings were given.
        let ids: Vec<&str> = self.matches.ids().map(|id| id.as_str()).collect();
        f.debug_struct("Flags").field("ids", &ids).finish()
    }
}

impl<S: Args> Flags<S> {
    /// The settings' flags in `args` alone, without the environment: for tests and tools that
    /// build a configuration from arguments they hold.
    pub fn from_flags<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let command = Self::command().mut_args(|a| a.env(None));
        let args =
            std::iter::once(OsString::from("settings")).chain(args.into_iter().map(Into::into));
        Self::from_arg_matches(&command.try_get_matches_from(args)?)
    }

    fn command() -> Command {
        S::augment_args(Command::new("settings"))
    }

    /// Flag or variable, else the file's value, else `fallback`, else the declared default.
    pub fn pick<T: Clone + Send + Sync + 'static>(
        &self,
        id: &str,
        file: Option<T>,
        fallback: Option<Layered<T>>,
    ) -> Option<Layered<T>> {
        self.layer(id, file, fallback, || {
            self.matches.get_one::<T>(id).cloned()
        })
    }

    /// [`Self::pick`] for a setting taking several values: the highest layer's list.
    pub fn pick_many<T: Clone + Send + Sync + 'static>(
        &self,
        id: &str,
        file: Option<Vec<T>>,
    ) -> Option<Layered<Vec<T>>> {
        self.layer(id, file, None, || {
            Some(self.matches.get_many::<T>(id)?.cloned().collect())
        })
    }

    /// The layering of [`Self::pick`] and [`Self::pick_many`]; `parsed` reads the flag's,
    /// variable's or default's value from the matches.
    fn layer<T>(
        &self,
        id: &str,
        file: Option<T>,
        fallback: Option<Layered<T>>,
        parsed: impl Fn() -> Option<T>,
    ) -> Option<Layered<T>> {
        let from = |source: Source| move |value| Layered { value, source };
        match self.given_source(id) {
            Some(source) => parsed().map(from(source)),
            None => file
                .map(from(Source::File))
                .or(fallback)
                .or_else(|| parsed().map(from(Source::Default))),
        }
    }

    fn given_source(&self, id: &str) -> Option<Source> {
        let arg = || {
            Self::command()
                .get_arguments()
                .find(|a| a.get_id() == id)
                .cloned()
        };
        match self.matches.value_source(id)? {
            ValueSource::CommandLine => {
                let long = arg().and_then(|a| a.get_long().map(str::to_owned));
                Some(Source::Flag(format!(
                    "--{}",
                    long.unwrap_or_else(|| id.to_owned())
                )))
            }
            ValueSource::EnvVariable => {
                let var = arg().and_then(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()));
                Some(Source::Env(var.unwrap_or_else(|| id.to_owned())))
            }
            _ => None,
        }
    }
}

/// No flags and no environment: every setting at its declared default.
impl<S: Args> Default for Flags<S> {
    fn default() -> Self {
        Self::from_flags(std::iter::empty::<&str>())
            .unwrap_or_else(|e| unreachable!("no arguments always parse: {e}"))
    }
}

impl<S> FromArgMatches for Flags<S> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            matches: matches.clone(),
            settings: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.matches = matches.clone();
        Ok(())
    }
}

impl<S: Args> Args for Flags<S> {
    fn augment_args(cmd: Command) -> Command {
        S::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        S::augment_args_for_update(cmd)
    }
}
