//! The request's JSON Schema (as in fal's OpenAPI document) and its table for the docs, both read
//! off [`FIELDS`].

use serde_json::{json, Map, Value};

use crate::request::FIELDS;

/// The request's JSON Schema, with the ranges, choices and defaults the parser applies.
pub fn input_schema() -> Value {
    let mut properties = Map::new();
    for field in FIELDS {
        let mut schema = (field.schema)();
        if let Some(object) = schema.as_object_mut() {
            object.insert("description".into(), json!(field.description.trim()));
            if let Some(default) = (field.default)().filter(|d| !d.is_null()) {
                object.insert("default".into(), default);
            }
        }
        properties.insert(field.name.into(), schema);
    }
    let required: Vec<&str> = FIELDS.iter().filter(|f| f.required).map(|f| f.name).collect();
    json!({
        "title": "Input",
        "type": "object",
        "required": required,
        "additionalProperties": false,
        "properties": properties,
    })
}

/// A Markdown table of the request fields: field, flag, default, what it allows and does (the
/// README's table is this text).
pub fn fields_table() -> String {
    let mut out = String::from("| request field | flag | default | allowed | what |\n|---|---|---|---|---|\n");
    for field in FIELDS {
        let default = match (field.default)() {
            None => "required".to_string(),
            Some(Value::Null) => "none".to_string(),
            Some(Value::String(text)) => format!("`{}`", json!(text)),
            Some(other) => format!("`{other}`"),
        };
        let description = field.description.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&format!(
            "| `{}` | `--{}` | {default} | {} | {description} |\n",
            field.name,
            field.flag,
            (field.allowed)().replace('|', "\\|"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::GenerateRequest;

    #[test]
    fn the_schema_states_the_parsers_defaults_and_ranges() {
        let schema = input_schema();
        let properties = schema["properties"].as_object().unwrap();
        let defaults: Map<String, Value> =
            properties.iter().filter_map(|(k, v)| v.get("default").map(|d| (k.clone(), d.clone()))).collect();
        let mut with_prompt = defaults.clone();
        with_prompt.insert("prompt".into(), json!("x"));
        // Every default the schema states is what the parser fills in, and every field but the
        // prompt, the seed and the input pictures has one. `enable_safety_checker` states
        // fal's `true`: absent, the parser leaves it to the server, which checks whenever it has
        // a checker loaded; `image_size` states `square_hd`: absent, the output takes the input
        // picture's size when there is one.
        assert_eq!(with_prompt.remove("enable_safety_checker"), Some(json!(true)));
        assert_eq!(with_prompt.remove("image_size"), Some(json!("square_hd")));
        assert_eq!(GenerateRequest::from_value(&Value::Object(with_prompt)).unwrap(), GenerateRequest::new("x"));
        assert_eq!(defaults.len(), properties.len() - 4);
        assert_eq!(schema["required"], json!(["prompt"]));
        assert_eq!(schema["properties"]["num_inference_steps"]["maximum"], 200);
        assert_eq!(schema["properties"]["image_size"]["anyOf"][1]["properties"]["width"]["minimum"], 16);
        assert!(properties.values().all(|p| p["description"].as_str().is_some_and(|d| !d.is_empty())));
    }

    #[test]
    fn the_table_lists_every_field_once() {
        let table = fields_table();
        for field in FIELDS {
            assert_eq!(table.matches(&format!("| `{}` |", field.name)).count(), 1, "{}", field.name);
        }
        assert!(table.contains("| `num_inference_steps` | `--steps` | `35` | 1–200 |"), "{table}");
        assert!(table.contains("| `prompt` | `--prompt` | required |"), "{table}");
    }
}
