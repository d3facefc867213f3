#include "runtime/base/json_writer.h"

#include <charconv>
#include <cmath>
#include <cstdio>

#include "runtime/base/check.h"

namespace ecss {

std::string JsonQuote(std::string_view value) {
  std::string out;
  out.reserve(value.size() + 2);
  out += '"';
  for (char c : value) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned char>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

void JsonWriter::BeforeValue() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (!depth_.empty()) {
    if (depth_.back()) out_ += ',';
    depth_.back() = true;
  }
}

JsonWriter& JsonWriter::Raw(std::string_view text) {
  BeforeValue();
  out_ += text;
  return *this;
}

JsonWriter& JsonWriter::BeginObject() {
  Raw("{");
  depth_.push_back(false);
  return *this;
}

JsonWriter& JsonWriter::EndObject() {
  ECSS_CHECK(!depth_.empty() && !after_key_) << "unbalanced EndObject";
  depth_.pop_back();
  out_ += '}';
  return *this;
}

JsonWriter& JsonWriter::BeginArray() {
  Raw("[");
  depth_.push_back(false);
  return *this;
}

JsonWriter& JsonWriter::EndArray() {
  ECSS_CHECK(!depth_.empty() && !after_key_) << "unbalanced EndArray";
  depth_.pop_back();
  out_ += ']';
  return *this;
}

JsonWriter& JsonWriter::Key(std::string_view key) {
  ECSS_CHECK(!depth_.empty() && !after_key_) << "Key outside an object";
  BeforeValue();
  out_ += JsonQuote(key);
  out_ += ':';
  after_key_ = true;
  return *this;
}

JsonWriter& JsonWriter::String(std::string_view value) { return Raw(JsonQuote(value)); }

JsonWriter& JsonWriter::Double(double value) {
  if (!std::isfinite(value)) return Null();
  char text[32];
  auto result = std::to_chars(text, text + sizeof(text), value);
  return Raw(std::string_view(text, static_cast<size_t>(result.ptr - text)));
}

JsonWriter& JsonWriter::Int(int64_t value) { return Raw(std::to_string(value)); }
JsonWriter& JsonWriter::Uint(uint64_t value) { return Raw(std::to_string(value)); }
JsonWriter& JsonWriter::Bool(bool value) { return Raw(value ? "true" : "false"); }
JsonWriter& JsonWriter::Null() { return Raw("null"); }

}  // namespace ecss
