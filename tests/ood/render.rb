# Renders one of an Open OnDemand app's ERB files as OnDemand does (ERB, trim mode "-"), with
# what OnDemand gives it: the form's attributes by name (submit.yml.erb), the same as `context`
# (template/*.erb), and locals such as the connection's host, port and password (view.html.erb)
# or the job's id (info.md.erb). Input on stdin, JSON: {"template", "attributes", "locals"}.
# Prints the result; an error raised by the template goes to stderr with exit status 1.
require "erb"
require "json"
require "ostruct"

class Session
  def initialize(attributes, locals)
    @attributes = attributes
    @locals = locals
  end

  def context
    OpenStruct.new(@attributes)
  end

  def method_missing(name, *args)
    key = name.to_s
    return @locals[key] if @locals.key?(key)
    return @attributes[key] if @attributes.key?(key)

    super
  end

  def respond_to_missing?(name, include_private = false)
    @locals.key?(name.to_s) || @attributes.key?(name.to_s) || super
  end

  def render(text)
    ERB.new(text, trim_mode: "-").result(binding)
  end
end

request = JSON.parse($stdin.read)
begin
  print Session.new(request.fetch("attributes", {}), request.fetch("locals", {})).render(File.read(request["template"]))
rescue StandardError => e
  warn "#{e.class}: #{e.message}"
  exit 1
end
