// A form built from a JSON schema of simple fields (a task type's arguments), and back.
import { h } from "./dom.js";

function simple(prop) {
  if (prop.anyOf) {
    const some = prop.anyOf.find((p) => p.type && p.type !== "null");
    return { ...prop, ...(some || {}), nullable: true };
  }
  return prop;
}

/** Inputs for the schema's properties; returns {node, read() -> args, throws on bad JSON}. */
export function schemaForm(schema, { prefix = "arg" } = {}) {
  const props = schema?.properties || {};
  const required = new Set(schema?.required || []);
  const fields = [];
  const node = h("div", { class: "fields" });
  for (const [name, raw] of Object.entries(props)) {
    const prop = simple(raw);
    const id = `${prefix}-${name}`;
    let input;
    let read;
    if (prop.enum) {
      input = h("select", { id, name }, (prop.nullable ? [""] : []).concat(prop.enum)
        .map((v) => h("option", { value: String(v), selected: v === prop.default }, String(v))));
      read = () => (input.value === "" ? undefined : input.value);
    } else if (prop.type === "boolean") {
      input = h("input", { id, name, type: "checkbox", checked: Boolean(prop.default) });
      read = () => (input.checked === Boolean(prop.default) ? undefined : input.checked);
    } else if (prop.type === "integer" || prop.type === "number") {
      input = h("input", {
        id, name, type: "number", step: prop.type === "integer" ? "1" : "any",
        min: prop.minimum ?? (prop.exclusiveMinimum !== undefined ? undefined : undefined),
        max: prop.maximum, required: required.has(name),
        placeholder: prop.default !== undefined && prop.default !== null ? String(prop.default) : "",
      });
      read = () => (input.value === "" ? undefined : Number(input.value));
    } else if (prop.type === "string") {
      input = h("input", { id, name, type: "text", required: required.has(name),
        placeholder: prop.default ? String(prop.default) : "" });
      read = () => (input.value === "" ? undefined : input.value);
    } else {
      input = h("textarea", { id, name, rows: 2, placeholder: "JSON" });
      read = () => {
        if (input.value.trim() === "") return undefined;
        try { return JSON.parse(input.value); } catch { throw new Error(`${name}: not valid JSON`); }
      };
    }
    fields.push([name, read]);
    node.append(h("label", { for: id, class: "field" },
      h("span", { class: "field-name" }, prop.title || name),
      input,
      prop.description ? h("small", { class: "muted" }, prop.description) : null));
  }
  return {
    node,
    read() {
      const args = {};
      for (const [name, read] of fields) {
        const v = read();
        if (v !== undefined) args[name] = v;
      }
      return args;
    },
  };
}
