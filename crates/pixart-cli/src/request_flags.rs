//! The request's fields as command-line flags, made from the field table
//! ([`pixart_fal::FIELDS`]): one flag per field (`--steps` for `num_inference_steps`…), each with
//! its `PIXART_*` variable, a help text stating what it allows and its default, and the same
//! check (and message) a JSON request gets.

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use pixart_fal::{FieldSpec, InvalidRequest, PartialRequest, FIELDS};

/// The request fields given as flags: `(JSON name, text)`, checked by clap as they were parsed.
#[derive(Debug, Clone, Default)]
pub struct RequestFlags {
    given: Vec<(&'static str, String)>,
}

impl RequestFlags {
    /// The fields these flags set.
    pub fn partial(&self) -> Result<PartialRequest, InvalidRequest> {
        PartialRequest::from_texts(self.given.iter().map(|(name, text)| (*name, text.as_str()))).map_err(InvalidRequest)
    }
}

/// `--steps` → `PIXART_STEPS`.
pub fn env_name(flag: &str) -> String {
    format!("PIXART_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// The help of a field's flag: its description, what it allows and its default.
fn help(field: &FieldSpec) -> String {
    let description = field.description.split_whitespace().collect::<Vec<_>>().join(" ");
    let default = match (field.default)() {
        None => "required".to_string(),
        Some(serde_json::Value::Null) => "none".to_string(),
        Some(serde_json::Value::String(text)) => format!("default {text}"),
        Some(value) => format!("default {value}"),
    };
    format!("{description} [{}; {default}]", (field.allowed)().replace('`', ""))
}

fn flag(field: &'static FieldSpec) -> Arg {
    let name = field.name;
    let arg = Arg::new(name)
        .long(field.flag)
        .env(env_name(field.flag))
        .help(help(field))
        .value_parser(move |text: &str| PartialRequest::default().set_text(name, text).map(|()| text.to_string()));
    if field.is_switch {
        arg.num_args(0..=1).default_missing_value("true")
    } else if field.is_list {
        arg.action(clap::ArgAction::Append)
    } else {
        arg
    }
}

impl FromArgMatches for RequestFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = FIELDS
            .iter()
            .flat_map(|field| {
                let values = matches.get_many::<String>(field.name).into_iter().flatten();
                values.map(|text| (field.name, text.clone()))
            })
            .collect();
        Ok(Self { given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for RequestFlags {
    fn augment_args(command: Command) -> Command {
        FIELDS.iter().fold(command, |command, field| command.arg(flag(field)))
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}
